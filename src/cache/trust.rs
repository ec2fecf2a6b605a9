//! What this instance may serve from its Redis generation, and when: keys whose invalidation
//! failed (pending), trust after a complete pass over the logs, the generation's stamps and
//! namespace, and how far the logs reached it.
use std::sync::atomic::Ordering;

use super::*;

/// Keys with a failed invalidation remembered one by one, at most.
const PENDING_MAX: usize = 100_000;

impl Redis {
    /// The invalidation of `key` could not be written: its copy is not served here until a
    /// later write of the key succeeds.
    pub(super) fn invalidation_failed(&self, key: &str) {
        let Some(inner) = self.inner() else {
            return;
        };
        let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= PENDING_MAX {
            inner.overflows.fetch_add(1, Ordering::AcqRel);
            return;
        }
        pending.insert(key.to_owned());
        inner.pending_len.store(pending.len(), Ordering::Release);
    }

    /// The invalidation of `key` was written.
    pub(super) fn invalidation_written(&self, key: &str) {
        let Some(inner) = self.inner() else {
            return;
        };
        if inner.pending_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.remove(key);
        inner.pending_len.store(pending.len(), Ordering::Release);
    }

    /// Whether `key`'s cached copy may be stale here (its invalidation failed).
    /// Whether any key's invalidation failed here and is not yet written.
    pub(super) fn any_pending(&self) -> bool {
        self.inner()
            .is_some_and(|inner| inner.pending_len.load(Ordering::Acquire) > 0)
    }

    pub(super) fn is_pending(&self, key: &str) -> bool {
        let Some(inner) = self.inner() else {
            return false;
        };
        inner.pending_len.load(Ordering::Acquire) > 0
            && inner
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(key)
    }

    /// Where the overflow count stands now; pass it to [`Redis::trust`] with the start of a pass
    /// over the logs that then completes.
    pub fn failure_mark(&self) -> u64 {
        self.inner()
            .map_or(0, |i| i.overflows.load(Ordering::Acquire))
    }

    /// A pass over the logs of `namespace` that started at `started` (and at failure count
    /// `mark`) has completed: copies may be served until `started + valid_for` — if that
    /// namespace's generation is still the one established and no reconnection happened since
    /// (its writes reached the servers the copies are read from; see [`Redis::adopt`]).
    /// `false` when the pass counts for nothing.
    pub fn trust(
        &self,
        namespace: &Namespace,
        mark: u64,
        started: std::time::Instant,
        valid_for: Duration,
    ) -> bool {
        let Some(inner) = self.inner() else {
            return false;
        };
        if !self.settled(namespace.stamp) {
            return false;
        }
        {
            inner.trusted_through.fetch_max(mark, Ordering::AcqRel);
            let elapsed = crate::clock::micros(started.elapsed());
            let began = crate::clock::boot_us().saturating_sub(elapsed);
            let until = began.saturating_add(crate::clock::micros(valid_for));
            inner.trusted_until.fetch_max(until, Ordering::SeqCst);
        }
        // A generation adopted while the pass ran starts untrusted (`adopt`): keep it so.
        self.settled(namespace.stamp) || {
            inner.trusted_until.store(0, Ordering::SeqCst);
            false
        }
    }

    /// Resolves once a new generation was adopted since the last call (never when Redis is
    /// disabled).
    pub async fn new_generation(&self) {
        match self.inner() {
            Some(inner) => inner.adopted.notified().await,
            None => std::future::pending().await,
        }
    }

    /// The generation established now, and the epoch (see [`Stamp`]); take it before writes
    /// whose arrival [`Redis::settled`] is to judge.
    pub fn stamp(&self) -> Stamp {
        self.inner().map_or(
            Stamp {
                generation: 0,
                epoch: 0,
            },
            |inner| {
                // The epoch first: an establishment bumps it before it changes the generation.
                let epoch = inner.epoch.load(Ordering::SeqCst);
                Stamp {
                    generation: inner.generation.load(Ordering::SeqCst),
                    epoch,
                }
            },
        )
    }

    /// Whether `stamp`'s generation is still the one established, with no establishment or
    /// reconnection since: what was written under it reached the servers copies are read from.
    pub fn settled(&self, stamp: Stamp) -> bool {
        self.inner().is_some_and(|inner| {
            stamp.generation != 0
                && !inner.latches.iter().any(Latch::tripped)
                && inner.generation.load(Ordering::SeqCst) == stamp.generation
                && inner.epoch.load(Ordering::SeqCst) == stamp.epoch
        })
    }

    /// Whether a pass over the logs completed within README's bound before `now`
    /// ([`crate::clock::boot_us`]): the in-process cache trusts its copies no longer than this
    /// either. `false` when Redis is disabled.
    pub fn followed(&self, now: u64) -> bool {
        self.inner()
            .is_some_and(|i| now < i.trusted_until.load(Ordering::Acquire))
    }

    /// The cache namespace that follows the logs: key prefix and generation (`None` while no
    /// generation is established, or Redis is disabled).
    pub fn namespace(&self) -> Option<Namespace> {
        let inner = self.inner()?;
        let stamp = self.stamp();
        match stamp.generation {
            0 => None,
            generation => Some(Namespace {
                name: format!("{}{SCHEMA_VERSION}|{generation}", inner.prefix),
                generation,
                stamp,
            }),
        }
    }

    /// From when revocations may not have reached this cache: where its namespace stands in the
    /// session log (`None` when Redis is disabled: such an instance applies nothing; the Unix
    /// epoch while unknown).
    pub fn log_position(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let inner = self.inner()?;
        let micros = inner.log_position.load(Ordering::Acquire);
        Some(chrono::DateTime::from_timestamp_micros(micros).unwrap_or_default())
    }

    pub fn set_log_position(&self, position: chrono::DateTime<chrono::Utc>) {
        if let Some(inner) = self.inner() {
            let micros = position.timestamp_micros();
            inner.log_position.fetch_max(micros, Ordering::AcqRel);
        }
    }

    /// The generation whose copies may be served *now*: `None` when Redis is disabled, when no
    /// generation is established for the servers currently connected (a reconnection not yet
    /// looked at), when no pass over the logs completed recently, or when too many invalidations
    /// failed to track them one by one. Call it after the reply whose value is to be judged (and
    /// see [`Redis::is_pending`] for the key itself).
    pub fn serving_generation(&self) -> Option<u64> {
        let inner = self.inner()?;
        // The latches first: the generation job zeroes the generation *before* it resets them,
        // so a generation read after clean latches is never one they had already disowned.
        if inner.latches.iter().any(Latch::tripped) {
            inner.changed.notify_one();
            return None;
        }
        let generation = inner.generation.load(Ordering::SeqCst);
        if generation == 0 {
            inner.changed.notify_one();
            return None;
        }
        let overflows = inner.overflows.load(Ordering::Acquire);
        let caught_up = inner.trusted_through.load(Ordering::Acquire) >= overflows;
        let fresh = self.followed(crate::clock::boot_us());
        (caught_up && fresh).then_some(generation)
    }

    /// The established generation, trusted or not (fills carry it; 0 when none).
    pub(super) fn write_generation(&self) -> u64 {
        self.inner()
            .map_or(0, |i| i.generation.load(Ordering::SeqCst))
    }
}
