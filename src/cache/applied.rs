//! Which log rows this instance's cache has already taken, so each is written once per cache,
//! whatever the size of the fleet: revoking calls write the rows of their user logged since the
//! cache's position, the follower writes what it reads (each row once, see `jobs::follow`), and
//! whoever wrote rows to the cache of a generation announces them to the other instances
//! ([`Announcement`], on the invalidation channel of `crate::local`), whose followers then skip
//! them. Kept per generation (a new one starts with nothing applied, and an announcement counts
//! only in the generation it names, on an instance settled in it) and pruned as the position
//! moves on.
use std::{collections::HashMap, sync::Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Redis, Stamp};

/// Rows the registry holds at most (about 50 MB).
const MOST_APPLIED: usize = 1_000_000;

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

/// Rows written to the cache of one generation, confirmed by its servers, as `(id, logged at in
/// microseconds since the epoch)` (JSON: `{"g":…,"s":[[id,µs]…],"p":[[id,µs]…]}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    #[serde(rename = "g")]
    pub generation: u64,
    #[serde(rename = "s", default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<(i64, i64)>,
    #[serde(rename = "p", default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<(i64, i64)>,
}

impl Announcement {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.profiles.is_empty()
    }

    /// The rows it names.
    pub fn len(&self) -> usize {
        self.sessions.len() + self.profiles.len()
    }

    /// Both announcements' rows, when they are of one generation (else this one's: announcing
    /// less only makes holders wait for their catch-up or their lease instead).
    pub fn merge(mut self, other: Announcement) -> Announcement {
        if self.is_empty() {
            return other;
        }
        if other.generation == self.generation {
            self.sessions.extend(other.sessions);
            self.profiles.extend(other.profiles);
        }
        self
    }

    /// Split so that none names more than `most` rows.
    pub fn chunks(self, most: usize) -> Vec<Announcement> {
        let part = |sessions: &[(i64, i64)], profiles: &[(i64, i64)]| Announcement {
            generation: self.generation,
            sessions: sessions.to_vec(),
            profiles: profiles.to_vec(),
        };
        let mut out: Vec<Announcement> = self.sessions.chunks(most).map(|c| part(c, &[])).collect();
        out.extend(self.profiles.chunks(most).map(|c| part(&[], c)));
        out
    }

    fn rows(&mut self, log: Log) -> &mut Vec<(i64, i64)> {
        match log {
            Log::Sessions => &mut self.sessions,
            Log::Profiles => &mut self.profiles,
        }
    }
}

impl Redis {
    fn applied(&self) -> Option<std::sync::MutexGuard<'_, Applied>> {
        let inner = self.inner()?;
        Some(inner.applied.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Which of these rows (`(id, logged at)`) the cache of `stamp`'s generation has not taken
    /// yet.
    ///
    /// All of them while a key's invalidation failed here (`Redis::is_pending`): such a key is
    /// served again only once this instance wrote it itself, whoever else did.
    pub fn unapplied(&self, stamp: Stamp, log: Log, rows: &[(i64, DateTime<Utc>)]) -> Vec<bool> {
        if self.any_pending() {
            return vec![true; rows.len()];
        }
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
    /// pass writes them again. What was recorded, to announce to the other instances.
    pub fn mark_applied(
        &self,
        stamp: Stamp,
        log: Log,
        rows: impl IntoIterator<Item = (i64, DateTime<Utc>)>,
    ) -> Announcement {
        let mut announcement = Announcement {
            generation: stamp.generation,
            ..Announcement::default()
        };
        if !self.settled(stamp) {
            return announcement;
        }
        if let Some(mut applied) = self.applied() {
            let seen = applied.current(stamp.generation);
            for (id, at) in rows {
                seen.insert((log, id), at);
                announcement.rows(log).push((id, at.timestamp_micros()));
            }
        }
        announcement
    }

    /// Another instance wrote these rows to the cache of the generation it names: recorded when
    /// this instance is settled in that generation (its own connections reach the same servers).
    pub fn take_announcement(&self, announcement: &Announcement) {
        let stamp = self.stamp();
        if stamp.generation != announcement.generation || !self.settled(stamp) {
            return;
        }
        let Some(mut applied) = self.applied() else {
            return;
        };
        let seen = applied.current(stamp.generation);
        // Only an optimisation: past this, announcements are dropped (an instance that cannot
        // complete a pass, hence prune, would otherwise keep the whole fleet's writes).
        if seen.len() >= MOST_APPLIED {
            return;
        }
        for (log, rows) in [
            (Log::Sessions, &announcement.sessions),
            (Log::Profiles, &announcement.profiles),
        ] {
            for (id, micros) in rows {
                let at = DateTime::<Utc>::from_timestamp_micros(*micros).unwrap_or_default();
                seen.insert((log, *id), at);
            }
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
        assert!(redis.mark_applied(before, Log::Profiles, rows).is_empty());
        let now = redis.stamp();
        assert_eq!(redis.unapplied(now, Log::Profiles, &rows), [true]);
        // Back to the same generation while the writes ran: not recorded either.
        redis.begin_establishing().await;
        redis.adopt(2, fingerprint("two"));
        assert!(redis.mark_applied(now, Log::Profiles, rows).is_empty());
        let again = redis.stamp();
        assert_eq!(redis.unapplied(again, Log::Profiles, &rows), [true]);
        // Settled: recorded (and announced).
        let announced = redis.mark_applied(again, Log::Profiles, rows);
        assert_eq!(announced.profiles, [(7, rows[0].1.timestamp_micros())]);
        assert_eq!(
            redis.unapplied(redis.stamp(), Log::Profiles, &rows),
            [false]
        );
    }
}
