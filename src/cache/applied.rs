//! Which log rows this instance's cache has already taken, so each is written once: revoking
//! calls apply the rows of their user logged since the cache's position, and every pass of the
//! follower re-reads the rows inside the in-flight allowance (see `store::outbox`). Kept per
//! generation (a new one starts with nothing applied) and pruned as the position moves on.
use std::{collections::HashMap, sync::Mutex};

use chrono::{DateTime, Utc};

use super::Redis;

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

    /// Which of these rows (`(id, logged at)`) this cache has not taken yet.
    pub fn unapplied(&self, log: Log, rows: &[(i64, DateTime<Utc>)]) -> Vec<bool> {
        let generation = self.write_generation();
        match self.applied() {
            Some(mut applied) => {
                let seen = applied.current(generation);
                rows.iter()
                    .map(|(id, _)| !seen.contains_key(&(log, *id)))
                    .collect()
            }
            None => vec![true; rows.len()],
        }
    }

    /// These rows reached the cache.
    pub fn mark_applied(&self, log: Log, rows: impl IntoIterator<Item = (i64, DateTime<Utc>)>) {
        let generation = self.write_generation();
        if let Some(mut applied) = self.applied() {
            let seen = applied.current(generation);
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
