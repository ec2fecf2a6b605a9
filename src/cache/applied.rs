//! Which log rows this instance's cache has already taken, so each is written once: revoking
//! calls apply the rows of their user logged since the cache's position, and every pass of the
//! follower re-reads the rows inside the in-flight allowance (see `store::outbox`). Kept per
//! generation (a new one starts with nothing applied) and pruned as the position moves on.
use std::{collections::HashMap, sync::Mutex};

use chrono::{DateTime, Utc};

use super::{Redis, Stamp};

/// The two logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Log {
    Sessions,
    Profiles,
}

#[derive(Default)]
pub(super) struct Applied {
    generation: u64,
    rows: HashMap<(Log, i64), DateTime<Utc>>,
}

impl Applied {
    fn current(&mut self, generation: u64) -> &mut HashMap<(Log, i64), DateTime<Utc>> {
        if self.generation != generation {
            self.generation = generation;
            self.rows.clear();
        }
        &mut self.rows
    }
}

impl Redis {
    fn applied(&self) -> Option<std::sync::MutexGuard<'_, Applied>> {
        let inner = self.inner()?;
        Some(inner.applied.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Which of these rows (`(id, logged at)`) the cache of `stamp`'s generation has not taken
    /// yet.
    pub fn unapplied(&self, stamp: Stamp, log: Log, rows: &[(i64, DateTime<Utc>)]) -> Vec<bool> {
        match self.applied() {
            Some(mut applied) => {
                let seen = applied.current(stamp.generation);
                rows.iter()
                    .map(|(id, _)| !seen.contains_key(&(log, *id)))
                    .collect()
            }
            None => vec![true; rows.len()],
        }
    }

    /// These rows, written under `stamp`, reached the cache — unless the stamp is no longer
    /// settled: the writes may then have gone to other servers than its generation's (a
    /// reconnection or an establishment while they ran), and are not recorded, so that a later
    /// pass writes them again.
    pub fn mark_applied(
        &self,
        stamp: Stamp,
        log: Log,
        rows: impl IntoIterator<Item = (i64, DateTime<Utc>)>,
    ) {
        if !self.settled(stamp) {
            return;
        }
        if let Some(mut applied) = self.applied() {
            let seen = applied.current(stamp.generation);
            seen.extend(rows.into_iter().map(|(id, at)| ((log, id), at)));
        }
    }

    /// Forgets rows logged before `horizon`: no reader looks at them again.
    pub fn prune_applied(&self, log: Log, horizon: DateTime<Utc>) {
        if let Some(mut applied) = self.applied() {
            applied
                .rows
                .retain(|(l, _), at| *l != log || *at >= horizon);
        }
    }
}

/// A mutex-guarded registry, as `Inner` holds it.
pub(super) type Registry = Mutex<Applied>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Fingerprint;

    fn fingerprint(run_id: &str) -> Fingerprint {
        Fingerprint::parse(&format!("h|{run_id}/replid//0")).unwrap()
    }

    async fn connected() -> Redis {
        let settings = crate::config::RedisSettings::default();
        Redis::connect(&settings, crate::metrics::Metrics::new())
            .await
            .unwrap()
    }

    /// The fault run's Sentinel seed 1795755029 found: an instance adopting a generation other
    /// instances had filled served it at once, trusted on passes made in the previous one (its
    /// own writes had gone to the previous servers). A new generation is served only after a
    /// pass in it.
    #[tokio::test]
    async fn a_new_generation_is_not_served_before_a_pass_in_it() {
        let redis = connected().await;
        let trust = |namespace| {
            let minute = std::time::Duration::from_secs(60);
            redis.trust(namespace, 0, std::time::Instant::now(), minute)
        };
        redis.begin_establishing().await;
        redis.adopt(1, fingerprint("one"));
        let first = redis.namespace().unwrap();
        assert!(trust(&first));
        assert_eq!(redis.serving_generation(), Some(1));
        redis.begin_establishing().await;
        redis.adopt(2, fingerprint("two"));
        assert_eq!(redis.serving_generation(), None);
        // A pass that began in the first generation earns nothing in the second.
        assert!(!trust(&first));
        assert_eq!(redis.serving_generation(), None);
        let second = redis.namespace().unwrap();
        assert!(trust(&second));
        assert_eq!(redis.serving_generation(), Some(2));
        // The same generation again (a reconnection to the same servers): still served.
        redis.begin_establishing().await;
        redis.adopt(2, fingerprint("two"));
        assert_eq!(redis.serving_generation(), Some(2));
    }

    /// An attack review found: rows written under one generation but recorded after an
    /// establishment had moved the cache to another (a write slow across a reconnection) were
    /// taken as applied in the new one, and every later pass there skipped them. The same for
    /// an establishment that came back to the same generation meanwhile.
    #[tokio::test]
    async fn rows_written_across_an_establishment_are_not_recorded() {
        let redis = connected().await;
        redis.begin_establishing().await;
        redis.adopt(1, fingerprint("one"));
        let rows = [(7, Utc::now())];
        let before = redis.stamp();
        assert_eq!(redis.unapplied(before, Log::Profiles, &rows), [true]);
        redis.begin_establishing().await;
        redis.adopt(2, fingerprint("two"));
        redis.mark_applied(before, Log::Profiles, rows);
        let now = redis.stamp();
        assert_eq!(redis.unapplied(now, Log::Profiles, &rows), [true]);
        // Back to the same generation while the writes ran: not recorded either.
        redis.begin_establishing().await;
        redis.adopt(2, fingerprint("two"));
        redis.mark_applied(now, Log::Profiles, rows);
        let again = redis.stamp();
        assert_eq!(redis.unapplied(again, Log::Profiles, &rows), [true]);
        // Settled: recorded.
        redis.mark_applied(again, Log::Profiles, rows);
        assert_eq!(
            redis.unapplied(redis.stamp(), Log::Profiles, &rows),
            [false]
        );
    }
}
